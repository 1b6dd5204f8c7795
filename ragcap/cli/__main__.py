from ragcap.cli import main

main()
