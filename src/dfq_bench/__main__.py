from dfq_bench.run.cli import main

main()
