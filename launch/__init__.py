"""Running the pipeline on clusters: the memory/time planner (`python -m launch.plan`) and the shell
launchers (SLURM, DeepSpeed hostfile, torchrun, Ray cluster) with their small Python helpers.
See launch/README.md."""
