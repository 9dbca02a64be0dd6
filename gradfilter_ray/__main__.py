import sys

from gradfilter_ray.cli import main

sys.exit(main())
