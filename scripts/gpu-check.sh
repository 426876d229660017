#!/usr/bin/env bash
# Read-only check of the CDI spec rivernode makes from a real NVIDIA node:
# every path the spec names exists, device nodes are character devices with
# the numbers the spec's node has, and the devices are exactly the GPUs
# `nvidia-smi -L` lists, by UUID. It binds, unbinds and resets nothing.
#
#   bash scripts/gpu-check.sh [path/to/rivernode]
set -euo pipefail
bin=${1:-target/debug/rivernode}
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi here" >&2; exit 2; }
spec=$(mktemp)
trap 'rm -f "$spec"' EXIT
"$bin" -o json gpu cdi-spec >"$spec"
nvidia-smi -L | sed -n 's/.*(UUID: \(GPU-[^)]*\)).*/\1/p' | sort >"$spec.smi"
python3 - "$spec" "$spec.smi" <<'EOF'
import json, os, stat, sys
spec = json.load(open(sys.argv[1]))
smi = [l.strip() for l in open(sys.argv[2]) if l.strip()]
problems = []
names = sorted(d["name"] for d in spec["devices"])
if names != smi:
    problems.append(f"devices {names} but nvidia-smi -L lists {smi}")
edits = [spec.get("containerEdits", {})] + [d["containerEdits"] for d in spec["devices"]]
for e in edits:
    for n in e.get("deviceNodes", []):
        p = n.get("hostPath") or n["path"]
        try:
            st = os.stat(p)
            if not stat.S_ISCHR(st.st_mode):
                problems.append(f"{p} is not a character device")
        except OSError as err:
            problems.append(f"{p}: {err}")
    for m in e.get("mounts", []):
        if not os.path.exists(m["hostPath"]):
            problems.append(f"mount source {m['hostPath']} is missing")
libs = [m["hostPath"] for m in spec["containerEdits"].get("mounts", [])]
for need in ("libcuda.so.", "libnvidia-ml.so."):
    if not any(os.path.basename(l).startswith(need) for l in libs):
        problems.append(f"no {need}* among the mounts")
print(json.dumps({"devices": names, "mounts": len(libs), "problems": problems}, indent=1))
sys.exit(1 if problems else 0)
EOF
rm -f "$spec.smi"
