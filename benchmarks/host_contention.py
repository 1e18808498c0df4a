"""Does a CPU expert on every core slow the next GPU layer's launches (OpenMP threads spinning after their
region), and is a CPU expert slower after a pause (threads gone to sleep) than back to back?

    python benchmarks/host_contention.py                          # torch's default threads (all cores)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/host_contention.py  # threads sleep at once after a region
    OMP_NUM_THREADS=15 python benchmarks/host_contention.py       # one core left to the launching thread

Needs a CUDA GPU. A Mixtral-8x7B expert (bf16, two weight copies cycled so each call reads memory) on the CPU,
and a stand-in for a decode layer's non-expert kernels (40 small launches) on the GPU; medians of 60 (30).
Written to test why the engine's CPU-placed experts run slower than predicted (validation/README.md,
session 15: it ruled both causes out on an H100 host).
"""
import os, statistics as st, sys, time
import torch

if not torch.cuda.is_available():
    raise SystemExit("benchmarks/host_contention.py: needs a CUDA GPU (none visible here)")
dev = torch.device("cuda")
threads = torch.get_num_threads()
h, f = 4096, 14336
copies = [tuple(torch.randn(s, dtype=torch.bfloat16) for s in ((f, h), (f, h), (h, f))) for _ in range(2)]
x = torch.randn(1, h, dtype=torch.bfloat16)
i = 0


def cpu_expert():
    global i
    i += 1
    w1, w3, w2 = copies[i % 2]
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


wq = torch.randn(h, h, dtype=torch.bfloat16, device=dev)
xs = torch.randn(1, h, dtype=torch.bfloat16, device=dev)


def gpu_layer():
    """about 40 small kernels, as a decode layer's attention block issues"""
    y = xs
    for _ in range(8):
        y = torch.nn.functional.rms_norm(y, (h,))
        y = y @ wq
        y = torch.nn.functional.silu(y) + xs
        y = y * 0.5
        y = y.contiguous()
    return y


def busy(s):
    t = time.perf_counter()
    while time.perf_counter() - t < s:
        pass


for _ in range(5):
    cpu_expert(); gpu_layer(); torch.cuda.synchronize()


def measure(mode, n=60):
    launch, total, cpu = [], [], []
    for _ in range(n):
        torch.cuda.synchronize()
        if mode == "after-cpu-expert":
            t = time.perf_counter(); cpu_expert(); cpu.append(time.perf_counter() - t)
        else:
            busy(0.006)
        t0 = time.perf_counter()
        gpu_layer()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        launch.append(t1 - t0); total.append(t2 - t0)
    return st.median(launch) * 1e3, st.median(total) * 1e3, (st.median(cpu) * 1e3 if cpu else 0.0)


def cpu_gap(mode, n=30):
    ts = []
    for _ in range(n):
        if mode == "gap":
            gpu_layer(); torch.cuda.synchronize(); busy(0.002)
        t = time.perf_counter(); cpu_expert(); ts.append(time.perf_counter() - t)
    return st.median(ts) * 1e3


print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} torch {torch.__version__} threads {threads}")
for r in range(3):
    a = measure("alone"); b = measure("after-cpu-expert")
    print(f"round {r}: GPU layer alone: launch {a[0]:.3f} ms, done {a[1]:.3f} ms | right after a CPU expert "
          f"({b[2]:.2f} ms): launch {b[0]:.3f} ms, done {b[1]:.3f} ms")
    print(f"         CPU expert back-to-back {cpu_gap('b2b'):.2f} ms, after a GPU layer and 2 ms {cpu_gap('gap'):.2f} ms")
