from portwatch.cli import main

raise SystemExit(main())
