from fmrilm.cli import main

main()
