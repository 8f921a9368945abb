"""The `pdao` command line (`main.app`) and the demo set-up."""
