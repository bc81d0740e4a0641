from dpldm.cli import main

raise SystemExit(main())
