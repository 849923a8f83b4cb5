// Stands in for Gloo's <gloo/common/error.h> (see README.md).
#pragma once
#include "../declarations.h"
