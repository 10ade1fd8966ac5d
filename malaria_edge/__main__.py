from malaria_edge.cli import main

main()
