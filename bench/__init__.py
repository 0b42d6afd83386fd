"""Benchmarks of the service, the query encoders and the indexer (`medsearch bench ...`).

Speed figures live here only: they are printed and written under ``bench/results``; tests never assert
them.
"""
