"""`make bench`: every benchmark of the project, results under bench/results/; on a machine where
torch sees a GPU, the GPU fit benches too (results *_cuda.json)."""

import os

import torch

from bench import fit_device, foundation, orchestration, provenance, scaleout, webserver_load


def main() -> None:
    foundation.main([])
    orchestration.main([])
    provenance.main([])
    scaleout.main([])
    webserver_load.main([])
    if torch.cuda.is_available():
        workers = ["--workers", str(os.cpu_count())]
        fit_device.main(workers)
        provenance.main(["--fit-device", "cuda", *workers])


if __name__ == "__main__":
    main()
