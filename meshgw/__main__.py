from meshgw.cli import main

main()
