"""The `fleet` command: argparse and printing only; the work is in the layers below."""
