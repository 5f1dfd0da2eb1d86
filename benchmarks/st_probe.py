"""sentence-transformers on the same model (fp32 torch), for embed_batching.py's comparison.

Runs in a separate interpreter that has torch and sentence-transformers (not ragline's default
install):  python benchmarks/st_probe.py MODEL_DIR SECONDS THREADS  -> prints "batch texts/s".
"""

import sys
import time

import torch
from sentence_transformers import SentenceTransformer

model_dir, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
model = SentenceTransformer(model_dir, device="cpu")
queries = ["How many days do I have to submit an expense claim?", "Where is the Lisbon office?"]
for batch in (1, 64):
    texts = (queries * batch)[:batch]
    model.encode(texts, batch_size=batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.encode(texts, batch_size=batch)
        n += batch
    print(batch, round(n / (time.perf_counter() - t0), 1), flush=True)
