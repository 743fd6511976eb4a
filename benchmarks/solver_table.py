"""Regenerate the README's solver table from the registry.

Run: python benchmarks/solver_table.py > benchmarks/results/solver_table.md
"""
import sdekit
from sdekit.cli.solvers_cmd import batch_invariance, starts_at_t1


def main() -> None:
    print("| name | family | kind | order | strong order | NFE/step | default grid "
          "| batch invariant "
          "| starts at alpha = 0 (t = 1 of flow) | paper |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def fmt(v):
        return "-" if v is None else f"{v:g}"

    for s in sdekit.list_solvers():
        nfe = "adaptive" if s["adaptive"] else s["nfe_per_step"]
        print(f"| `{s['name']}` | {s['family']} | {s['kind']} | {fmt(s['order'])} | "
              f"{fmt(s['strong_order'])} | {nfe} | {s['grid_rule']} | {batch_invariance(s)} | "
              f"{starts_at_t1(s)} | {s['paper']} |")


if __name__ == "__main__":
    main()
