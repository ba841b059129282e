"""``python -m bench``: run every scenario once and print the ratios."""

from bench.main import main

if __name__ == "__main__":
    main()
