"""BibTeX of the method (HBT) and of the benchmark (LAReQA): the model card and the `evaluate` metric cite these."""

HBT_BIBTEX = """\
@article{hbt2024,
  title   = {A Synergistic Approach for Simultaneous Optimization of Monolingual, Cross-lingual, and Multilingual
             Information Retrieval},
  journal = {arXiv preprint arXiv:2408.10536},
  year    = {2024},
  url     = {https://arxiv.org/abs/2408.10536}
}
"""
LAREQA_BIBTEX = """\
@inproceedings{roy2020lareqa,
  title     = {LAReQA: Language-Agnostic Answer Retrieval from a Multilingual Pool},
  author    = {Roy, Uma and Constant, Noah and Al-Rfou, Rami and Barua, Aditya and Phillips, Aaron and Yang, Yinfei},
  booktitle = {Proceedings of EMNLP},
  year      = {2020},
  url       = {https://arxiv.org/abs/2004.05484}
}
"""
