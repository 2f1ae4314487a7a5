"""One line per kernel from Nsight Compute's `--csv --page details` output:
duration, SM / memory / L2 / DRAM / L1 throughput, registers, occupancy,
grid and cluster, and cycles per issued instruction (METRICS).

    python benchmarks/ncu_summary.py ncu.csv

(ncu prints its own log lines before the CSV; they are skipped.)
"""

import collections
import csv
import sys

METRICS = (
    ("Duration", "time"),
    ("Compute (SM) Throughput", "SM%"),
    ("Memory Throughput", "mem%"),
    ("L2 Cache Throughput", "L2%"),
    ("DRAM Throughput", "DRAM%"),
    ("L1/TEX Cache Throughput", "L1%"),
    ("Registers Per Thread", "regs"),
    ("Achieved Occupancy", "occ%"),
    ("Grid Size", "grid"),
    ("Cluster Size", "cluster"),
    ("Shared Memory Configuration Size", "smem KB"),
    ("Warp Cycles Per Issued Instruction", "cyc/issue"),
)


def main(path):
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    kernels = collections.OrderedDict()
    for row in csv.DictReader(lines):
        k = kernels.setdefault(row["ID"], {"name": row["Kernel Name"], "metrics": {}})
        k["metrics"][row["Metric Name"]] = (row["Metric Value"], row["Metric Unit"])
    for kid, k in kernels.items():
        short = k["name"][:48]  # LaunchStats' cluster and grid tell the CUTLASS ones apart
        values = []
        for metric, label in METRICS:
            if metric in k["metrics"]:
                value, unit = k["metrics"][metric]
                values.append(f"{label}={value}{'' if unit in ('%', '') else unit}")
        print(f"[{kid}] {short}: " + " ".join(values))


if __name__ == "__main__":
    main(sys.argv[1])
