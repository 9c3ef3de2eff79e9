"""`make bench`: every benchmark of the project, results under bench/results/."""

from bench import foundation, orchestration


def main() -> None:
    foundation.main([])
    orchestration.main([])


if __name__ == "__main__":
    main()
