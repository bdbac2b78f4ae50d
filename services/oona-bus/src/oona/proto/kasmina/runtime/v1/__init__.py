"""Generated from proto/ by `python -m oona.codegen`; do not edit."""
