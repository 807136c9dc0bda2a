"""Teachers: producers of ``TeacherSignal`` for a student's rollout (see docs/ARCHITECTURE.md).

``LocalTeacher`` scores with a Hugging Face causal LM in this process, chunked over response positions
so that peak memory is O(chunk_size x V); ``build_teacher`` makes the configured one.
"""

from opdkit.teacher.base import Teacher, build_teacher
from opdkit.teacher.local import SUPPORT_SOURCES, LocalTeacher, position_ids_from_mask

__all__ = ["LocalTeacher", "SUPPORT_SOURCES", "Teacher", "build_teacher", "position_ids_from_mask"]
