"""The click command-line interface: parse, call one workflow, render."""
