#!/usr/bin/env bash
# The README's SciFact results: launch/recipe.sh with the scifact preset (SciFact's train queries train, its test
# queries evaluate, documents cut to 64 tokens); every option of recipe.sh is accepted, e.g.
#
#   launch/scifact.sh [--shared=../shared] [--out=runs/scifact] [--limit=N] [--shards=8] [--steps=N]
#                     [--max_queries=N] [--dataset=DIR] [--dry-run] [-- TRAINER_OVERRIDES...]
#
# See launch/recipe.sh for the stages. Run it from the repository root.
exec bash "$(dirname "${BASH_SOURCE[0]}")/recipe.sh" --preset=scifact "$@"
