from capscale.cli import main

raise SystemExit(main())
