"""Training: the jitted step (`trainer`) and its parts, the run's inputs (`sources`) and its log (`logger`)."""
