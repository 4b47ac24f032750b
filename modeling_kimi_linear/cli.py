"""``kimi-linear`` console command (placeholder until the CLI lands)."""
def main() -> int:
    raise SystemExit("kimi-linear: the command line is not built yet")
