"""Training and evaluation of A2BFR and RoboFace on AttrFace shards (framework code only, no Dagster).

Populated by the training issues; the dataset factory (``attrface_pipeline``) does not import it.
"""
