from rekku.cli import main

main()
