"""One module per command: each exposes ``main(args, params) -> int | None``."""
