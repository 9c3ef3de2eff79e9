"""`make bench`: every benchmark of the project, results under bench/results/."""

from bench import foundation


def main() -> None:
    foundation.main([])


if __name__ == "__main__":
    main()
