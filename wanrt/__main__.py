"""`python -m wanrt ...`, which is also what `torchrun --nproc_per_node=N -m wanrt generate ...` runs."""

if __name__ == "__main__":
    try:
        from wanrt.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the CLI's modules import: no traceback
        import sys

        sys.stderr.write("interrupted\n")
        sys.exit(130)
    main()
