import sys

from readmission.localstack.cli import main

sys.exit(main())
