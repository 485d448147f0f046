"""Official Wan2.1 flow-matching solvers, vendored verbatim as the test oracle for wanrt.schedulers.

Source: https://github.com/Wan-Video/Wan2.1 commit 9737cba9c1c3c4d04b33fcad41c111989865d315
(wan/utils/fm_solvers.py, wan/utils/fm_solvers_unipc.py), Apache-2.0 (LICENSE.txt here).
Needs diffusers (a test dependency). Never imported by wanrt/.
"""
