from dpo_ray.cli import main

raise SystemExit(main())
