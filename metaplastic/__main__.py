"""``python -m metaplastic``: the command line."""

from .run._cli import main

if __name__ == "__main__":
    main()
