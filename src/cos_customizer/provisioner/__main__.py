import sys

from cos_customizer.provisioner.main import main

sys.exit(main())
