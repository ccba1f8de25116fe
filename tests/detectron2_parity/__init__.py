"""Detectron2 training parity: the seeded inputs (recipe.py), the script that had Detectron2 compute its numbers
(make_reference.py) and those numbers (reference.json). The test is tests/test_detectron2_parity.py."""
