from fastpref.bench.harness import main

raise SystemExit(main())
