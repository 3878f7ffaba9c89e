"""Command-line parsing shared by the commands that take a config plus `key=value` overrides."""

from __future__ import annotations

import argparse


class IntermixedParser(argparse.ArgumentParser):
    """Lets `key=value` overrides and options come in any order (`CONFIG --phase 2 a=b c=d`).

    A sub-parser made by `add_parser` becomes one with `parser.__class__ = IntermixedParser`."""

    _busy = False

    def parse_known_args(self, args=None, namespace=None):
        if self._busy:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False
