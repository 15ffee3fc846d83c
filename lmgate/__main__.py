from lmgate.cli import main

main()
