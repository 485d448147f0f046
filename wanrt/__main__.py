"""`python -m wanrt ...`, which is also what `torchrun --nproc_per_node=N -m wanrt generate ...` runs."""

from wanrt.cli import main

if __name__ == "__main__":
    main()
