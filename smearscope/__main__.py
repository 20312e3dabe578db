from smearscope.cli import main

raise SystemExit(main())
