"""What ``python -m torchlns`` runs: the demo (the main job), the ``formats`` table, the
``convert``/``report``/``compare`` commands, and the generated driving scenes they use.

Nothing below imports from here.
"""
