# Shared by the launchers (sourced, not run): XLA flag presets and the dry-run switch.
#
# A preset is launch/xla_flags/NAME.flags: one flag per line, each documented by the comment above it. TPU presets
# (tpu_*) are read by libtpu from LIBTPU_INIT_ARGS; the others by XLA from XLA_FLAGS.

O1_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The flags of preset $1 on one line (comments and blank lines dropped).
o1_preset_flags() {
  local file="$O1_LAUNCH_DIR/xla_flags/$1.flags"
  if [[ ! -f "$file" ]]; then
    echo "unknown XLA flag preset '$1'; presets: $(cd "$O1_LAUNCH_DIR/xla_flags" && ls | sed 's/\.flags$//' | tr '\n' ' ')" >&2
    return 2
  fi
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$file" | paste -sd' ' -
}

# NAME=VALUE for preset $1: the variable its flags belong in.
o1_preset_env() {
  local flags
  flags="$(o1_preset_flags "$1")" || return
  if [[ "$1" == tpu_* ]]; then echo "LIBTPU_INIT_ARGS=$flags"; else echo "XLA_FLAGS=$flags"; fi
}

# Runs "$@"; with O1_DRY_RUN=1 prints it instead, shell-quoted after "+ ", so it can be pasted.
o1_run() {
  if [[ "${O1_DRY_RUN:-0}" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# export NAME=VALUE; with O1_DRY_RUN=1 also prints it, so a dry run shows the environment the command gets.
o1_export() {
  export "$1=$2"
  if [[ "${O1_DRY_RUN:-0}" == 1 ]]; then printf '+ export %s=%q\n' "$1" "$2"; fi
}
