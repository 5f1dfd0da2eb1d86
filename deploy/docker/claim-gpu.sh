#!/bin/sh
# ragline-claim-gpu COMMAND...: run COMMAND pinned to the first GPU no other replica holds.
#
# Under `docker compose`, the generate-gpu service has one replica per GPU (RAGLINE_GPUS) and every
# replica reserves all of them: Docker hands each `count: N` reservation the same first N GPUs, so
# a per-replica pin cannot come from the reservation. Each replica takes an exclusive lock on
# gpu-<i>.lock in a volume the replicas share and keeps it (fd 9, inherited by COMMAND) for its
# lifetime; a dead replica's lock goes with it, so its restart claims a free GPU again.
set -eu
n="${RAGLINE_GPUS:?set RAGLINE_GPUS to the number of GPUs (one generate replica each)}"
dir="${RAGLINE_GPU_LOCK_DIR:-/run/ragline-gpus}"
mkdir -p "$dir"
i=0
while [ "$i" -lt "$n" ]; do
    exec 9>"$dir/gpu-$i.lock"
    if flock -n 9; then
        echo "ragline-claim-gpu: GPU $i of $n" >&2
        # The process sees only its GPU, as device 0.
        export CUDA_VISIBLE_DEVICES="$i" RAGLINE_GENERATE_GPU=0
        exec "$@"
    fi
    exec 9>&-
    i=$((i + 1))
done
echo "ragline-claim-gpu: all $n GPUs are held by other replicas (more replicas than" \
    "RAGLINE_GPUS?)" >&2
exit 1
