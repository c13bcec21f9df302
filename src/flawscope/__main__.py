from flawscope.cli import main

raise SystemExit(main())
