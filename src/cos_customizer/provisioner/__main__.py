"""`python -m cos_customizer.provisioner`: the guest agent, as the static executable runs it."""

import sys

from cos_customizer.provisioner.main import main

sys.exit(main())
