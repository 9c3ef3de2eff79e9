"""`make bench`: every benchmark of the project, results under bench/results/."""

from bench import foundation, orchestration, provenance, scaleout


def main() -> None:
    foundation.main([])
    orchestration.main([])
    provenance.main([])
    scaleout.main([])


if __name__ == "__main__":
    main()
