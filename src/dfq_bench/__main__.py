from dfq_bench.cli import main

main()
