"""Test support that ships with the package: tiny random stand-ins of the Hugging Face hub
repositories the recipes name (:mod:`slug_pl.testing.standins`), written in the repositories'
own folder layouts, so that tests and the benchmarks' ``--tiny`` modes run a user's first
commands offline."""
