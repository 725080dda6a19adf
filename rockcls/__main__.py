import sys

from rockcls.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
